"""The table compiled graphs find policies in does not grow with use: a backend's policies
share its slot, which is freed with the backend."""

import gc

import csp_inductor
from csp_inductor import policy_table
from csp_inductor.policies import CSP, Oracle
from csp_inductor.testing import tiny_model


def test_a_backend_given_new_policies_keeps_one_slot_freed_with_it():
    model = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    backend = model.csp_backend
    size = len(policy_table._POLICIES)
    for i in range(20):  # an evaluation's per-batch oracles, each a different policy
        oracle = Oracle(budget=0.2, positions=((i,),))
        backend.policy = oracle
        assert policy_table.policy_at(backend.policy_index) is oracle
    assert len(policy_table._POLICIES) == size
    index = int(backend.policy_index)
    csp_inductor.restore(model)
    del model, backend
    gc.collect()
    assert policy_table.policy_at(index) is None
    free = set(policy_table._FREE)
    assert index in free
    again = csp_inductor.compile(tiny_model("llava"), CSP(0.3), compile=False)
    assert int(again.csp_backend.policy_index) in free  # a freed slot, reused
    assert len(policy_table._POLICIES) == size


def test_registered_policies_are_named_once():
    first = policy_table.register_policy(CSP(budget=0.25))
    assert policy_table.register_policy(CSP(budget=0.25)) == first
    assert policy_table.policy_at(first) == CSP(budget=0.25)
