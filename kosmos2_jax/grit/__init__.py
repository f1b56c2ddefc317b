"""GRIT construction (reference §4): captioned images -> grounded records (noun chunks and
referring expressions linked to boxes), locally or as an Apache Beam pipeline."""
