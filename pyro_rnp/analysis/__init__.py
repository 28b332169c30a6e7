"""The analysis layer: what a trained model is measured and looked at with.

    evaluate.py       held-out -ELBO, the importance-weighted bound, MSE, per class
    ppc.py            posterior and prior predictive checks with image statistics
    plots.py          plotting helpers; reconstructions, samples, curves, parses
    program_space.py  t-SNE of program vectors, clusters, interpolation, the primitive library
    transfer.py       adapting only the encoder to classes a run never saw
    per_image.py      fitting a few images with one Normal each (the autonormal guide)

Each function states which models it works on (``pyro_rnp.model.registry.require``).
"""
