"""The two methods the at-scale tests run, with the settings they share."""

import spd_optax as spd


def adam_spd(learning_rate=3e-2, **options):
  return spd.adam_spd(learning_rate=learning_rate, weight_decay=1.0, **options)


def adam_ftp(learning_rate=3e-2, **options):
  return spd.adam_ftp(learning_rate=learning_rate, **options)


METHODS = {'spd': adam_spd, 'ftp': adam_ftp}
METHOD_CASES = tuple((name, name) for name in METHODS)
