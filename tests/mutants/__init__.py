"""A small mutation campaign: plant known bugs, run the suite, see which tests notice."""
