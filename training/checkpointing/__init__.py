"""Checkpoints: what is on disk, how it is checked, when a run saves and resumes.

    layout.py        the format: OUT_DIR/ckpt/step_N, its side files and manifest, `latest`, verification,
                     finding the newest good tag, RNG states (the one owner of the format)
    safe_load.py     reading a checkpoint never runs code from it (every pickle read the safe way first)
    universal.py     DeepSpeed's universal checkpoint: resuming on another number of ranks or ZeRO stage
    checkpointer.py  when a run saves and how it resumes (the schedule, the hand-over between ranks)
"""
