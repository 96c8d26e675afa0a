"""lmms-eval plugin: evaluate a hidrop model under any vision-token schedule with lmms-eval's task suite.

    make install EXTRAS=dev,lmms   # or: pip install 'hidrop[lmms]'
    python -m lmms_eval --model hidrop \\
        --model_args pretrained=/models/llava-1.5-7b-hf,schedule=hidrop_tok64,dtype=bfloat16 \\
        --tasks mme,gqa,pope --batch_size 8 --output_path logs/

lmms-eval >= 0.6 finds the model through the `lmms_eval.models` entry point (pyproject.toml), which
names `manifest` below. The older LMMS_EVAL_PLUGINS=hidrop.lmms_plugin route still works: it reads
AVAILABLE_MODELS from `hidrop.lmms_plugin.models` and adds the (empty) `hidrop.lmms_plugin.tasks`
to the task path.
"""

MODEL_CLASS = "hidrop.lmms_plugin.models.hidrop.HiDropLMM"


def manifest():
    """The entry point's payload: lmms-eval calls it and registers the `hidrop` model (imported only
    when a run asks for it)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="hidrop", simple_class_path=MODEL_CLASS)
