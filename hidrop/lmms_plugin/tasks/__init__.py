"""No tasks of our own: the folder exists because LMMS_EVAL_PLUGINS=hidrop.lmms_plugin makes lmms-eval add
`<plugin>.tasks` to its task search path, and fails when the package is missing."""
