/* See editline.h: readline() is getline() on stdin after printing the prompt. */
#define _GNU_SOURCE
#include "editline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int rl_point = 0;
int rl_end = 0;
char *rl_line_buffer = NULL;
const char *rl_readline_name = NULL;
int el_hist_size = 0;

char *readline(const char *prompt)
{
    char *line = NULL;
    size_t size = 0;
    ssize_t n;
    if (prompt) {
        fputs(prompt, stdout);
        fflush(stdout);
    }
    n = getline(&line, &size, stdin);
    if (n < 0) {
        free(line);
        return NULL;
    }
    if (n > 0 && line[n - 1] == '\n')
        line[n - 1] = '\0';
    return line;
}

void add_history(const char *line) { (void) line; }
int read_history(const char *filename) { (void) filename; return 0; }
int write_history(const char *filename) { (void) filename; return 0; }
void rl_refresh_line(int ignore1, int ignore2) { (void) ignore1; (void) ignore2; }
int rl_insert_text(const char *text) { (void) text; return 0; }
el_status_t el_ring_bell(void) { return CSstay; }
void el_print_columns(int ac, char **av) { (void) ac; (void) av; }
el_status_t el_bind_key(int key, el_keymap_func_t function)
{
    (void) key;
    (void) function;
    return CSdone;
}
