"""Data: text cleaning and vocabularies, Flickr8k, translation corpora, time series, GloVe, synthetic sets."""
