"""What every feature shares: options, the guard header, payload checks, the pipeline."""
