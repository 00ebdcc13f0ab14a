/* io_util.h: file and IR helpers for the ONNX I/O tests (and anyone who needs them): whole-file
 * read/write, scratch folders, discovery of model.onnx files, and a field-by-field comparison of
 * two IRs. Plain functions returning bool/counts; they never fail the running test themselves. */
#ifndef OPQ_TEST_IO_UTIL_H
#define OPQ_TEST_IO_UTIL_H

#include <stdbool.h>
#include <stddef.h>

#include "ir.h"

// Reads a whole file into malloc'd memory (caller frees). false on any error.
bool io_read_file(const char *path, void **buf, size_t *len);
// Writes (creates or truncates) a file. false on any error.
bool io_write_file(const char *path, const void *buf, size_t len);
bool io_file_exists(const char *path);
// mkdir with mode 0755; false on error.
bool io_mkdir(const char *path);

// A fresh folder under $TMPDIR or /tmp (malloc'd path), removed with its files by io_rmtree.
char *io_tempdir(void);
// Removes a folder and every file/folder inside it.
void io_rmtree(const char *dir);
// Number of entries in a folder (excluding . and ..), -1 on error.
int io_count_entries(const char *dir);

// Every file named `name` below `root` (recursive), sorted; *paths is malloc'd (free with
// io_free_paths). Returns the count (0 if none or on error).
int io_find_files(const char *root, const char *name, char ***paths);
void io_free_paths(char **paths, int n);

// Structural equality of two models: model fields, opsets, metadata, graph lists (names, dtypes,
// shapes, symbolic dims), initializer bytes, nodes and every attribute. On a difference, writes
// a one-line explanation to why (if non-NULL) and returns false.
bool io_model_equal(const struct opq_model *a, const struct opq_model *b, char *why, size_t n);

#endif
