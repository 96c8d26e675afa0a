"""What lmms-eval's LMMS_EVAL_PLUGINS hook reads: model name -> class name in the module of that name."""

AVAILABLE_MODELS = {"hidrop": "HiDropLMM"}
