// Counters of the CUDA device-table cache (NOTE: [table cache] in
// csrc/cuda/launch_table.h), readable in every build through
// fastaccum::_cuda_table_stats: the CUDA build installs its source at load
// time; without one the counters are all 0.
#pragma once

#include "cuda/launch_table.h"

namespace fastaccum {

using TableStatsSource = cuda::TableStats (*)(bool clear);
void set_table_stats_source(TableStatsSource source);

}  // namespace fastaccum
