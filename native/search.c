#include "pyargs.h"

PyMethodDef cmh_search_methods[] = {{NULL, NULL, 0, NULL}};
