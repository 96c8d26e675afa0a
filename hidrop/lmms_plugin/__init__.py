"""lmms-eval plugin: evaluate a hidrop model under any vision-token schedule with lmms-eval's task suite.

    pip install lmms-eval          # optional; not a dependency of hidrop
    LMMS_EVAL_PLUGINS=hidrop.lmms_plugin python -m lmms_eval --model hidrop \\
        --model_args pretrained=/models/llava-1.5-7b-hf,schedule=hidrop_tok64,dtype=bfloat16 \\
        --tasks mme,gqa,pope --batch_size 1

lmms-eval imports `hidrop.lmms_plugin.models`, reads AVAILABLE_MODELS and loads the class from
`hidrop.lmms_plugin.models.hidrop`.
"""
