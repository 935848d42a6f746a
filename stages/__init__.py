"""One module per CLI stage; each is a short story of set-up, run and clean-up calling `kdpipe.pipeline`."""
