"""The training application behind ``gravac-train`` and ``gravac-plot``: the paper's models,
data loaders (PTB, CIFAR, digits), the command line and the plots. It uses the library
(``horovod_gravac``) and never the other way round; it needs the ``bench`` extra."""
