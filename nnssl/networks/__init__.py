"""Network builders and helpers: ``from_plans`` (networks from a configuration's plans), ``pair`` (two networks as
one module), ``features`` (bottleneck / decoder features by hooks), ``modules`` (unwrap, eval mode),
``pretrained_2d`` (M&N's slice-wise 2D network; needs segmentation-models-pytorch)."""
