"""A run's identity: the settings a resume must not change (the launcher records them in
run.yaml's `identity`, launch.run_files.run_identity), and those `--set resume.allow_changed`
may let change. Shared by the option parsing (plan.job) and the run directory's check
(run.directory.prepare)."""

# Identity fields that resume.allow_changed may let a resume change, and the global batch
# a checkpoint was trained with. Not the LoRA shape or --random-init: the checkpoint's
# weights would not load.
RESUME_CHANGEABLE = ("model", "method", "data", "eval_data", "eval_split", "seq_len",
                     "data_format", "chat_template", "system_prompt", "packing",
                     "assistant_only_loss",
                     "global_batch")
