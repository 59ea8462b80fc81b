"""Model evaluation: perplexity with a sliding window (`ember eval ppl`)."""
