"""Bridges to other libraries, each imported on its own (``csp_inductor.integrations.kvpress``)
so that csp_inductor does not depend on them."""
