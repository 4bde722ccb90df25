"""What shards the model: the training loop talks to `interface.Engine` only.

    interface.py         what the loop may ask of an engine (loss, backward, step, lr, grad norm, save, load)
    deepspeed_engine.py  DeepSpeed ZeRO 0-3 behind it (the default)
    fsdp_engine.py       PyTorch FSDP2 behind it
    ds_config.py         the DeepSpeed JSON: loaded, checked against the run, resolved (the one reader of the
                         ZeRO stage, `zero_stage`)
"""
