"""Read-mostly admin pages for the HR example data, to look around after ``make demo``."""

from django.contrib import admin

from hr.models import Employee, Notification, PasswordReset, ReportRecalc


@admin.register(Employee)
class EmployeeAdmin(admin.ModelAdmin):
    """Employees: search by name or address."""

    list_display = ("name", "email", "department")
    list_filter = ("department",)
    search_fields = ("name", "email")


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    """Notifications the gateway accepted."""

    list_display = ("employee", "event_version", "gateway_message_id", "sent_at")
    list_select_related = ("employee",)


@admin.register(PasswordReset)
class PasswordResetAdmin(admin.ModelAdmin):
    """Password resets and how long each waited."""

    list_display = ("employee", "requested_at", "started_at", "sent_at")
    list_select_related = ("employee",)


@admin.register(ReportRecalc)
class ReportRecalcAdmin(admin.ModelAdmin):
    """Report recalculations (one per finished run)."""

    list_display = ("run_id", "event_version", "status", "notified", "created_at")
