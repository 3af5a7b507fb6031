"""The policies compiled graphs refer to, by index.

Policies are Python objects; a custom op cannot take one, so the ops refer to them by their
index in this table, passed as a 0-d tensor: a graph input, so switching policies does not
recompile. The op bodies find a policy with :func:`policy_at`.

The table does not grow with use. A backend owns one :class:`PolicySlot`, into which each new
policy it is given goes (replacing the last), freed for reuse when the backend is collected;
:func:`register_policy` names a fixed policy (``Full()``, a test's) once for the process,
equal policies sharing it.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .policies import Policy

_POLICIES: list[Policy | None] = []  # by index; None: a free slot
_FREE: list[int] = []
_NAMED: dict[Policy, int] = {}  # register_policy's indices, by policy


def _take(policy: Policy | None) -> int:
    if _FREE:
        index = _FREE.pop()
        _POLICIES[index] = policy
        return index
    _POLICIES.append(policy)
    return len(_POLICIES) - 1


def _free(index: int) -> None:
    _POLICIES[index] = None
    _FREE.append(index)


def register_policy(policy: Policy) -> int:
    """A small int naming ``policy`` inside compiled graphs, for the rest of the process."""
    if policy not in _NAMED:
        _NAMED[policy] = _take(policy)
    return _NAMED[policy]


class PolicySlot:
    """An index of the table for ``owner``'s policy, which changes: :meth:`set` puts one there.
    ``index`` is the 0-d tensor the compiled graph reads; the slot is freed when ``owner`` is
    garbage collected."""

    def __init__(self, owner: object):
        self.index = torch.tensor(_take(None))
        weakref.finalize(owner, _free, int(self.index))

    def set(self, policy: Policy) -> None:
        _POLICIES[int(self.index)] = policy


def policy_at(index: int | Tensor) -> Policy:
    """The policy at ``index`` (an int or a 0-d tensor)."""
    return _POLICIES[int(index)]
