"""LoRA tuning of served models: the job directory contract, dataset preparation, the trainer, checkpoints,
adapter export, and the worker process that runs jobs one at a time.

The HTTP side talks to the worker only through job directories on disk (see `jobs.py`): it writes `job.json`
and `cancel`, and reads `progress.json` and `adapter/`.
"""
