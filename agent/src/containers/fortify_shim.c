/* Debian builds libseccomp with _FORTIFY_SOURCE, so its libseccomp.a calls glibc's
 * checked __fprintf_chk (only in seccomp_export_pfc, the text dump). musl has every
 * other C function libseccomp uses but not this one; it is plain fprintf. */
#include <stdarg.h>
#include <stdio.h>

int __fprintf_chk(FILE *stream, int flag, const char *format, ...)
{
    (void)flag;
    va_list ap;
    va_start(ap, format);
    int written = vfprintf(stream, format, ap);
    va_end(ap);
    return written;
}
