/* ironsync._scandir: `scan_folder` of ironsync/scan.py (scan_folder_py), in C.
 *
 * Why: a no-change rescan of a storage is one stat per file, and in Python each costs ~1.5 us
 * on top of the system call (an os.stat_result, a tuple, a dict lookup): 100k files took 0.8 s
 * where `rsync -a --dry-run` needs 0.55 s (bin/bench-scan). Here the folder is read and every
 * file stat'ed with the GIL released (fstatat relative to the folder), then compared with the
 * index's rows with no Python object made for a file that did not change but its path.
 *
 * The contract is scan_folder_py's, entry for entry (tests/test_scan.py runs both on the same
 * trees); the Python version is used when this module is not built. POSIX only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#ifdef __APPLE__
#define MTIME(st) ((st).st_mtimespec)
#define CTIME(st) ((st).st_ctimespec)
#else
#define MTIME(st) ((st).st_mtim)
#define CTIME(st) ((st).st_ctim)
#endif

/* ironsync/ignore.py: TEMP_PREFIX, TEMP_SUFFIX, IGNORE_FILE, STATE_DIR */
#define TEMP_PREFIX ".ironsync-"
#define TEMP_SUFFIX ".tmp"
#define IGNORE_FILE ".ignore"
#define STATE_DIR ".ironsync"

typedef struct {
    size_t name_at; /* offset of the NUL-terminated name in the names buffer */
    size_t name_len;
    unsigned char type; /* d_type */
    int stat_errno;     /* 0: `st` holds the lstat of the entry; -1: not stat'ed */
    struct stat st;
} Entry;

typedef struct {
    Entry *entries;
    size_t count, capacity;
    char *names;
    size_t names_used, names_capacity;
} Listing;

static void listing_free(Listing *l) {
    PyMem_RawFree(l->entries);
    PyMem_RawFree(l->names);
}

/* Read the folder and lstat its files (regular or of unknown type), without the GIL.
   Returns 0, or an errno (nothing usable in `l` then). */
static int list_folder(const char *path, Listing *l) {
    DIR *dir = opendir(path);
    if (dir == NULL) {
        return errno;
    }
    int dfd = dirfd(dir);
    int failed = 0;
    for (;;) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (d == NULL) {
            failed = errno;
            break;
        }
        const char *name = d->d_name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'))) {
            continue;
        }
        size_t len = strlen(name);
        if (l->count == l->capacity) {
            size_t capacity = l->capacity ? 2 * l->capacity : 64;
            Entry *grown = PyMem_RawRealloc(l->entries, capacity * sizeof(Entry));
            if (grown == NULL) {
                failed = ENOMEM;
                break;
            }
            l->entries = grown;
            l->capacity = capacity;
        }
        if (l->names_used + len + 1 > l->names_capacity) {
            size_t capacity = l->names_capacity ? 2 * l->names_capacity : 4096;
            while (capacity < l->names_used + len + 1) {
                capacity *= 2;
            }
            char *grown = PyMem_RawRealloc(l->names, capacity);
            if (grown == NULL) {
                failed = ENOMEM;
                break;
            }
            l->names = grown;
            l->names_capacity = capacity;
        }
        Entry *e = &l->entries[l->count++];
        e->name_at = l->names_used;
        e->name_len = len;
        memcpy(l->names + l->names_used, name, len + 1);
        l->names_used += len + 1;
        e->type = d->d_type;
        e->stat_errno = -1;
        if (e->type == DT_REG || e->type == DT_UNKNOWN) {
            e->stat_errno = fstatat(dfd, name, &e->st, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
        }
    }
    closedir(dir);
    return failed;
}

static int starts_with(const char *s, size_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return len >= n && memcmp(s, prefix, n) == 0;
}

static int ends_with(const char *s, size_t len, const char *suffix) {
    size_t n = strlen(suffix);
    return len >= n && memcmp(s + len - n, suffix, n) == 0;
}

/* A name of ironsync's own (ignore.is_internal for a file in the folder at `prefix`). */
static int is_own_file(const char *name, size_t len, int at_root) {
    if (starts_with(name, len, TEMP_PREFIX) && ends_with(name, len, TEMP_SUFFIX)) {
        return 1;
    }
    return at_root && (strcmp(name, IGNORE_FILE) == 0 || strcmp(name, STATE_DIR) == 0);
}

/* sec * 10**9 + nsec, as os.stat_result's st_*_ns (exact for any time_t). */
static PyObject *time_ns(time_t sec, long nsec) {
    if (sec > -9000000000LL && sec < 9000000000LL) {
        return PyLong_FromLongLong((long long)sec * 1000000000LL + nsec);
    }
    PyObject *s = PyLong_FromLongLong((long long)sec);
    PyObject *billion = PyLong_FromLong(1000000000L);
    PyObject *n = PyLong_FromLong(nsec);
    PyObject *product = (s && billion) ? PyNumber_Multiply(s, billion) : NULL;
    PyObject *sum = (product && n) ? PyNumber_Add(product, n) : NULL;
    Py_XDECREF(s);
    Py_XDECREF(billion);
    Py_XDECREF(n);
    Py_XDECREF(product);
    return sum;
}

/* (rel, size, mtime_ns, ctime_ns, inode, mode & 0o777), as scan_folder_py builds it. */
static PyObject *file_row(PyObject *rel, const struct stat *st) {
    PyObject *size = PyLong_FromLongLong((long long)st->st_size);
    PyObject *mtime = time_ns(MTIME(*st).tv_sec, MTIME(*st).tv_nsec);
    PyObject *ctime = time_ns(CTIME(*st).tv_sec, CTIME(*st).tv_nsec);
    PyObject *inode = PyLong_FromUnsignedLongLong((unsigned long long)st->st_ino);
    PyObject *mode = PyLong_FromLong((long)(st->st_mode & 0777));
    PyObject *row = NULL;
    if (size && mtime && ctime && inode && mode) {
        row = PyTuple_Pack(6, rel, size, mtime, ctime, inode, mode);
    }
    Py_XDECREF(size);
    Py_XDECREF(mtime);
    Py_XDECREF(ctime);
    Py_XDECREF(inode);
    Py_XDECREF(mode);
    return row;
}

/* Item `i` of `row` is the integer `value` (0 when it is not, or not an int). */
static int item_is(PyObject *row, Py_ssize_t i, long long value) {
    PyObject *item = PyTuple_GET_ITEM(row, i);
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
    int overflow;
    long long got = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (got == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return !overflow && got == value;
}

/* file_row(rel, st) == previous[:6], without building the row: 1, 0, or -1 on error. The
   index's rows carry more items (scan.IndexRow), which are not compared. */
static int same_row(PyObject *previous, PyObject *rel, const struct stat *st) {
    time_t msec = MTIME(*st).tv_sec, csec = CTIME(*st).tv_sec;
    if (!PyTuple_CheckExact(previous) || PyTuple_GET_SIZE(previous) < 6 ||
        msec <= -9000000000LL || msec >= 9000000000LL || csec <= -9000000000LL ||
        csec >= 9000000000LL || (unsigned long long)st->st_ino > (unsigned long long)LLONG_MAX) {
        PyObject *row = file_row(rel, st); /* the general comparison */
        PyObject *head = PySequence_GetSlice(previous, 0, 6);
        int same = row && head ? PyObject_RichCompareBool(head, row, Py_EQ) : -1;
        Py_XDECREF(row);
        Py_XDECREF(head);
        return same;
    }
    int same = item_is(previous, 1, (long long)st->st_size) &&
               item_is(previous, 2, (long long)msec * 1000000000LL + MTIME(*st).tv_nsec) &&
               item_is(previous, 3, (long long)csec * 1000000000LL + CTIME(*st).tv_nsec) &&
               item_is(previous, 4, (long long)st->st_ino) &&
               item_is(previous, 5, (long long)(st->st_mode & 0777));
    if (!same) {
        return 0;
    }
    /* the path: the key `previous` was found under, so equal unless the row says otherwise */
    PyObject *path = PyTuple_GET_ITEM(previous, 0);
    return path == rel ? 1 : PyObject_RichCompareBool(path, rel, Py_EQ);
}

static int add_note(PyObject *notes, const char *note, PyObject *rel, PyObject *detail) {
    PyObject *item = Py_BuildValue("(sOO)", note, rel, detail ? detail : Py_None);
    if (item == NULL) {
        return -1;
    }
    int result = PyList_Append(notes, item);
    Py_DECREF(item);
    return result;
}

/* The entry's name as os.scandir gives it (UTF-8, surrogateescape); *valid = strict UTF-8. */
static PyObject *decode_name(const char *name, size_t len, int *valid) {
    *valid = 1;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)name[i] >= 0x80) {
            PyObject *strict = PyUnicode_DecodeUTF8(name, (Py_ssize_t)len, "strict");
            if (strict != NULL) {
                return strict;
            }
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                return NULL;
            }
            PyErr_Clear();
            *valid = 0;
            return PyUnicode_DecodeFSDefaultAndSize(name, (Py_ssize_t)len);
        }
    }
    return PyUnicode_DecodeASCII(name, (Py_ssize_t)len, "strict");
}

/* One entry, with the GIL. Returns 1 if the file is unchanged, 0 if not (or not a file),
   -1 on error. */
static int scan_entry(const Entry *e, const char *name, PyObject *folder, PyObject *prefix,
                      int at_root, PyObject *known, PyObject *ignores_file, PyObject *walked,
                      PyObject *changed, PyObject *notes) {
    int valid, result = -1;
    PyObject *rel = NULL, *detail = NULL, *row = NULL;
    PyObject *name_obj = decode_name(name, e->name_len, &valid);
    if (name_obj == NULL) {
        return -1;
    }
    rel = PyUnicode_Concat(prefix, name_obj);
    if (rel == NULL) {
        goto done;
    }
    if (!valid) {
        result = add_note(notes, "bad name", rel, NULL);
        goto done;
    }
    unsigned char type = e->type;
    if (type == DT_UNKNOWN) { /* the file system does not say: the lstat does */
        if (e->stat_errno == ENOENT) {
            result = add_note(notes, "other", rel, NULL); /* as DirEntry says of it: no type */
            goto done;
        }
        if (e->stat_errno != 0) {
            goto unreadable; /* as DirEntry.is_file() raising */
        }
        mode_t m = e->st.st_mode;
        type = S_ISREG(m) ? DT_REG : S_ISDIR(m) ? DT_DIR : S_ISLNK(m) ? DT_LNK : DT_FIFO;
    }
    if (type == DT_REG) {
        if (is_own_file(name, e->name_len, at_root)) {
            result = 0;
            goto done;
        }
        if (ignores_file != Py_None) {
            PyObject *answer = PyObject_CallOneArg(ignores_file, rel);
            if (answer == NULL) {
                goto done;
            }
            int ignored = PyObject_IsTrue(answer);
            Py_DECREF(answer);
            if (ignored != 0) {
                result = ignored < 0 ? -1 : 0;
                goto done;
            }
        }
        if (e->stat_errno == ENOENT) {
            result = 0;
            goto done;
        }
        if (e->stat_errno != 0) {
            goto unreadable;
        }
        if (PyList_Append(walked, rel) < 0) {
            goto done;
        }
        PyObject *previous = PyDict_GetItemWithError(known, rel);
        if (previous == NULL && PyErr_Occurred()) {
            goto done;
        }
        Py_XINCREF(previous);
        int same = previous == NULL ? 0 : same_row(previous, rel, &e->st);
        Py_XDECREF(previous);
        if (same < 0) {
            goto done;
        }
        if (!same) {
            row = file_row(rel, &e->st);
            if (row == NULL || PyList_Append(changed, row) < 0) {
                goto done;
            }
        }
        result = same;
    } else if (type == DT_LNK) {
        result = add_note(notes, "symlink", rel, NULL);
    } else if (type == DT_DIR) {
        Py_ssize_t end = PyUnicode_GET_LENGTH(folder);
        int slash = end > 0 && PyUnicode_READ_CHAR(folder, end - 1) == '/';
        detail = PyUnicode_FromFormat(slash ? "%U%U" : "%U/%U", folder, name_obj);
        result = detail == NULL ? -1 : add_note(notes, "dir", rel, detail);
    } else {
        result = add_note(notes, "other", rel, NULL);
    }
    goto done;
unreadable: {
    detail = PyUnicode_DecodeLocale(strerror(e->stat_errno), "surrogateescape");
    if (detail == NULL || add_note(notes, "error", rel, detail) < 0) {
        goto done;
    }
    int is_known = PyDict_Contains(known, rel);
    if (is_known < 0 || (is_known && PyList_Append(walked, rel) < 0)) {
        goto done;
    }
    result = 0; /* cannot tell: keep what the index says */
}
done:
    Py_XDECREF(name_obj);
    Py_XDECREF(rel);
    Py_XDECREF(detail);
    Py_XDECREF(row);
    return result;
}

static PyObject *scan_folder(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *folder, *prefix, *known, *ignores_file, *walked, *changed, *notes;
    if (!PyArg_ParseTuple(args, "UUO!OO!O!O!:scan_folder", &folder, &prefix, &PyDict_Type,
                          &known, &ignores_file, &PyList_Type, &walked, &PyList_Type, &changed,
                          &PyList_Type, &notes)) {
        return NULL;
    }
    PyObject *path_bytes = NULL;
    if (!PyUnicode_FSConverter(folder, &path_bytes)) {
        return NULL;
    }
    Listing listing = {0};
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = list_folder(PyBytes_AS_STRING(path_bytes), &listing);
    Py_END_ALLOW_THREADS
    Py_DECREF(path_bytes);
    if (failed) {
        listing_free(&listing);
        errno = failed;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, folder);
    }
    int at_root = PyUnicode_GET_LENGTH(prefix) == 0;
    long unchanged = 0;
    for (size_t i = 0; i < listing.count; i++) {
        const Entry *e = &listing.entries[i];
        int same = scan_entry(e, listing.names + e->name_at, folder, prefix, at_root, known,
                              ignores_file, walked, changed, notes);
        if (same < 0) {
            listing_free(&listing);
            return NULL;
        }
        unchanged += same;
    }
    listing_free(&listing);
    return PyLong_FromLong(unchanged);
}

static PyMethodDef methods[] = {
    {"scan_folder", scan_folder, METH_VARARGS,
     "scan_folder(folder, prefix, known, ignores_file, walked, changed, notes) -> int\n\n"
     "ironsync.scan.scan_folder_py in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ironsync._scandir",
    "One folder of a scan in C: see ironsync/scan.py (scan_folder_py).", -1, methods,
};

PyMODINIT_FUNC PyInit__scandir(void) { return PyModule_Create(&module); }
