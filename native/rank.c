#include "pyargs.h"

PyMethodDef cmh_rank_methods[] = {{NULL, NULL, 0, NULL}};
