"""clipmill.dit: the bundled spacetime Diffusion Transformer, trained from a dataset's committed shards.

model.py (the whole model, flow objective and presets; imports only torch), encoders.py (text and latent
encoders), data.py (shards -> decoded clips -> buckets -> batches), train.py (loop, checkpoints, Ray Train),
sample.py (text/image-to-video, extend, infill), toy.py (the toy world of bench/toy_t2v.py), mark.py (marking and
safety of generated video), cli.py (`clipmill train`, `clipmill sample`). Importing the package imports nothing
heavy.
"""
