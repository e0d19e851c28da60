// Loaded into the GPU check's Python processes (LD_PRELOAD, benchmarks/gpu_check.sh): on a crash
// (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) it appends the native stack to the file named by
// NATIVE_BACKTRACE_FILE, then lets the signal end the process as it would have. The GPU machine has
// no gdb, and faulthandler shows only Python frames: run 6 lost a CPU test's crash to that.
// Installed before Python starts, so pytest's faulthandler, which chains to the handler it
// replaces, still prints the Python frames first.
#define _GNU_SOURCE
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char* backtrace_file = 0;

static void write_text(int fd, const char* text) {
  ssize_t unused = write(fd, text, strlen(text));
  (void)unused;
}

static const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGILL: return "SIGILL";
    case SIGFPE: return "SIGFPE";
    default: return "SIGABRT";
  }
}

static void on_crash(int sig) {
  // Only async-signal-safe calls: open, write, backtrace_symbols_fd (backtrace itself was called
  // once at start-up, so that it does not load libgcc here).
  int fd = open(backtrace_file, O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd >= 0) {
    void* frames[64];
    int n = backtrace(frames, 64);
    write_text(fd, "\n== native backtrace (");
    write_text(fd, signal_name(sig));
    write_text(fd, ")\n");
    backtrace_symbols_fd(frames, n, fd);
    write_text(fd, "== end of native backtrace\n");
    close(fd);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  backtrace_file = getenv("NATIVE_BACKTRACE_FILE");
  if (backtrace_file == 0 || backtrace_file[0] == '\0') return;
  void* warm[1];
  backtrace(warm, 1);
  const int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
  for (size_t i = 0; i < sizeof signals / sizeof signals[0]; ++i) signal(signals[i], on_crash);
}
