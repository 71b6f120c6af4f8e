/* A stand-in for troglobit's editline (not packaged by Debian), for building Lix
 * with scripts/build-lix-tarball.sh: the symbols Lix's repl uses, with readline()
 * reading one line from stdin. No line editing, no history, no completion. */
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { CSdone = 0, CSeof, CSmove, CSdispatch, CSstay, CSsignal } el_status_t;
typedef el_status_t el_keymap_func_t(void);

#define CTL(x) ((x) & 0x1F)

extern int rl_point;
extern int rl_end;
extern char *rl_line_buffer;
extern const char *rl_readline_name;
extern int el_hist_size;

char *readline(const char *prompt);
void add_history(const char *line);
int read_history(const char *filename);
int write_history(const char *filename);
void rl_refresh_line(int ignore1, int ignore2);
int rl_insert_text(const char *text);
el_status_t el_ring_bell(void);
void el_print_columns(int ac, char **av);
el_status_t el_bind_key(int key, el_keymap_func_t function);

#ifdef __cplusplus
}
#endif
