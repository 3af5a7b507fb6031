"""The policies compiled graphs refer to, by index.

Policies are Python objects; a custom op cannot take one, so the ops refer to them by their
index in this table, passed as a 0-d tensor: a graph input, so switching policies does not
recompile. :func:`register_policy` gives a policy its index, :func:`policy_at` (in the op
bodies) finds it again.
"""

from __future__ import annotations

from torch import Tensor

from .policies import Policy

_POLICY_IDS: dict[Policy, int] = {}
_POLICIES: list[Policy] = []


def register_policy(policy: Policy) -> int:
    """A stable small int naming ``policy`` inside compiled graphs."""
    if policy not in _POLICY_IDS:
        _POLICY_IDS[policy] = len(_POLICIES)
        _POLICIES.append(policy)
    return _POLICY_IDS[policy]


def policy_at(index: int | Tensor) -> Policy:
    """The policy :func:`register_policy` named ``index`` (an int or a 0-d tensor)."""
    return _POLICIES[int(index)]
