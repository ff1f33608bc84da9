"""Checking composed configs: typed value checks that name the key and the allowed values (``validation``)
and every check of a whole training config (``checks``)."""
