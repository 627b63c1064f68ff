/* cmhash._hamming: native Hamming-space kernels for cmhash.
 *
 * The module is put together from method tables defined next to their kernels:
 * search.c (distances, kNN, radius search), mih.c (multi-index hashing) and rank.c
 * (ranking metrics). This file
 * holds only the SIMD-level controls and the module definition. */
#include "pyargs.h"

#include "kernels.h"
#include "threads.h"

extern PyMethodDef cmh_search_methods[];
extern PyMethodDef cmh_rank_methods[];
extern PyMethodDef cmh_mih_methods[];

static int level_from_name(PyObject *name, const char *func) {
    const char *s = PyUnicode_AsUTF8(name);
    if (!s) return -2;
    for (int level = 0; level < CMH_SIMD_COUNT; level++)
        if (strcmp(s, cmh_simd_name(level)) == 0) return level;
    PyErr_Format(PyExc_ValueError, "%s(): unknown SIMD level '%s' (choose from generic, popcnt, avx2, avx512, neon)",
                 func, s);
    return -2;
}

PyDoc_STRVAR(simd_levels_doc, "simd_levels() -> list[str]\n\n"
                              "The kernel levels this CPU can run, from slowest to fastest.");
static PyObject *simd_levels(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int level = 0; level < CMH_SIMD_COUNT; level++) {
        if (!cmh_simd_supported(level)) continue;
        PyObject *name = PyUnicode_FromString(cmh_simd_name(level));
        if (!name || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
    }
    return out;
}

PyDoc_STRVAR(get_simd_level_doc, "get_simd_level() -> str\n\nThe kernel level in use.");
static PyObject *get_simd_level(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(cmh_simd_name(cmh_simd_current()));
}

PyDoc_STRVAR(set_simd_level_doc,
             "set_simd_level(name, /) -> None\n\n"
             "Use the kernels of `name` ('generic', 'popcnt', 'avx2', 'avx512' on x86-64;\n"
             "'generic', 'neon' on ARM64) from now on.\n"
             "ValueError for an unknown name, RuntimeError when this CPU cannot run it.");
static PyObject *set_simd_level(PyObject *self, PyObject *name) {
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "set_simd_level(): name must be str, not '%.200s'",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    int level = level_from_name(name, "set_simd_level");
    if (level < 0) return NULL;
    if (cmh_simd_set(level) < 0) {
        PyErr_Format(PyExc_RuntimeError, "set_simd_level(): this CPU cannot run the '%s' kernels",
                     cmh_simd_name(level));
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sysinfo_doc, "sysinfo() -> dict\n\nBuild and CPU facts: SIMD levels, CPU count, limits.");
static PyObject *sysinfo(PyObject *self, PyObject *noargs) {
    PyObject *levels = simd_levels(self, NULL);
    if (!levels) return NULL;
    PyObject *out = Py_BuildValue("{s:N,s:s,s:s,s:n,s:i,s:i}", "simd_levels", levels, "simd_level",
                                  cmh_simd_name(cmh_simd_current()), "simd_best",
                                  cmh_simd_name(cmh_simd_best()), "cpu_count",
                                  (Py_ssize_t)cmh_cpu_count(), "max_code_bytes", CMH_MAX_BYTES,
                                  "max_bits", CMH_MAX_BYTES * 8);
    return out;
}

static PyMethodDef base_methods[] = {
    {"simd_levels", simd_levels, METH_NOARGS, simd_levels_doc},
    {"get_simd_level", get_simd_level, METH_NOARGS, get_simd_level_doc},
    {"set_simd_level", set_simd_level, METH_O, set_simd_level_doc},
    {"sysinfo", sysinfo, METH_NOARGS, sysinfo_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cmhash._hamming",
    .m_doc = "Native Hamming-space kernels: distances, exact kNN, radius search and ranking metrics "
             "over packed binary codes. The GIL is released while they run.",
    .m_size = -1,
    .m_methods = base_methods,
};

PyMODINIT_FUNC PyInit__hamming(void) {
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, cmh_search_methods) < 0 ||
        PyModule_AddFunctions(m, cmh_rank_methods) < 0 ||
        PyModule_AddFunctions(m, cmh_mih_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* The level can be pinned for the whole process, e.g. to compare kernels. */
    const char *env = getenv("CMHASH_SIMD");
    if (env && *env) {
        int level = -1;
        for (int l = 0; l < CMH_SIMD_COUNT; l++)
            if (strcmp(env, cmh_simd_name(l)) == 0) level = l;
        if (level < 0 || cmh_simd_set(level) < 0) {
            PyErr_Format(PyExc_RuntimeError,
                         "CMHASH_SIMD=%s: not a level this CPU can run (choose from generic, popcnt, "
                         "avx2, avx512 on x86-64, generic, neon on ARM64, as "
                         "cmhash._hamming.simd_levels() lists)", env);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
