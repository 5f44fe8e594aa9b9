"""Client-level differential privacy: clipping, seeded Gaussian noise, bounded statistics and
the accountant (README "Privacy"). Pure math in clipping/noise/statistics/accountant; the
round loop's glue in mechanism.py."""
