"""Pipeline stages over a composed config, one module per stage:
prepare_model → calib_data → act_stats → quantize (calibrate, for OmniQuant) → eval_ppl, eval_zeroshot,
pack → mlc_compile, bench_speed, speed_turns; tables over all metrics; ``run_cell`` chains a cell in memory for
Hydra multirun sweeps. What several stages share is in :mod:`omniquant.stages.common`, where artifacts
live in :mod:`omniquant.layout`.

Each stage reads the config, writes one artifact, and validates its inputs before writing anything.
``pipelines/<stage>.py`` runs ``omniquant.stages.<stage>.<stage>`` as a Hydra app.
"""
