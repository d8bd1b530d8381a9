"""The HR example app: employees, their notifications, password resets and a report."""
