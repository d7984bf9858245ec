"""One file per algorithm. A trainer wires library pieces (config, data, models, losses, the shared
loop) for one algorithm; no library code imports a trainer."""
