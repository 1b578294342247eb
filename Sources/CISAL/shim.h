#include <isa-l/erasure_code.h>
#include <isa-l/gf_vect_mul.h>
