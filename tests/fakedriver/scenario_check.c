/*
 * Test tool: the scenario parser alone, built with AddressSanitizer and UBSan.
 *
 * Reads records from stdin, each "<length>\n" followed by <length> bytes of scenario text,
 * and answers one line per record: "ok <ngpus>" or "error <line>: <reason>". Any memory or
 * undefined-behaviour error aborts the process (the test sees it die).
 */
#include "common.h"

#include <stdio.h>
#include <stdlib.h>

int main(void)
{
    static fd_scenario sc;
    char header[32];
    while (fgets(header, sizeof header, stdin)) {
        char *endp;
        unsigned long len = strtoul(header, &endp, 10);
        if (endp == header || len > FD_MAX_FILE) {
            fprintf(stderr, "scenario-check: bad record header\n");
            return 2;
        }
        char *buf = malloc(len ? len : 1); /* exact size: ASan catches reads past the end */
        if (!buf || fread(buf, 1, len, stdin) != len) {
            fprintf(stderr, "scenario-check: short record\n");
            return 2;
        }
        int line = 0;
        char why[512];
        if (fd_parse(buf, len, &sc, &line, why, sizeof why))
            printf("ok %u\n", sc.ngpus);
        else
            printf("error %d: %s\n", line, why);
        fflush(stdout);
        free(buf);
    }
    return 0;
}
