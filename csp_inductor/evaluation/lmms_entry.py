"""lmms-eval's entry point (``lmms_eval.models`` group): names the model class without importing
it, so that lmms-eval's registry, which reads entry points while it is being imported, loads
no model code."""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            "csp_inductor", chat_class_path="csp_inductor.evaluation.lmms_plugin.CSPInductor"
        )
    ]
