"""The benchmark: a declared grid of (scenario x method x seed) runs, resumable, summarised
into one results folder (raw metrics, markdown tables, PNG plots)."""
