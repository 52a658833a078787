// The kernels as of the baseline commit (baseline_flash.cu: `git show c28e860:.../flash.cu`,
// kernels renamed qfbase_*).
#include "baseline_flash.cu"
