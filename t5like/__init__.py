# Before any t5like module imports jax: no libtpu start-up (and its errors) on a machine without TPU chips.
from t5like.platforms import exclude_absent_tpu

exclude_absent_tpu()
