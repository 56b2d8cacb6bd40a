from django import template

from releases import permissions

register = template.Library()


@register.filter
def decides_gates(user) -> bool:
    """Whether `user` may decide some gate (an approver): the page offers them notifications."""
    return permissions.can_approve(user)
