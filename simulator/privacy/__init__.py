"""Privacy of what clients share (one room, DESIGN §9).

* :mod:`.config` - the ``privacy:`` scenario section;
* :mod:`.mechanism` - clipping and Gaussian noise on per-class sums and counts (client side);
* :mod:`.accounting` - dp-accounting calibration and the epsilon spent;
* :mod:`.client` - the one hook the client handler calls when it forms an upload;
* :mod:`.run` - checks before a run (what DP cannot cover is refused), release counting, the summary keys;
* :mod:`.empirical` - the canary audit: an empirical lower bound on epsilon;
* :mod:`.secagg` - secure aggregation of per-class sums and counts;
* :mod:`.attack` - leakage attacks on what the server received (``protofed attack``).
"""
