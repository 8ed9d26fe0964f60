"""Benchmarks behind `minicpm bench {sparse,train,data,edge,mup,mup-transfer}`: each prints a table of ratios
measured side by side in one run, never a bare time (the μP ones: widest / narrowest layer RMS, best-lr drift per
doubling of width). They ship in the package so an installed `minicpm` runs them; the data benchmark lives with the
data pipeline (`data_pipeline/bench.py`)."""
