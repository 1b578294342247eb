#include <zlib.h>
// deflateInit/inflateInit are macros; expose them as functions.
static inline int fc_deflateInit(z_streamp s, int level) { return deflateInit(s, level); }
static inline int fc_inflateInit(z_streamp s) { return inflateInit(s); }
