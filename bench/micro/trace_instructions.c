// Counts the instructions a program executes between two SIGSTOPs it sends itself, by single-stepping it: the
// dynamic instruction mix of the AVX-512 kernels, which valgrind cannot run (it takes the AVX2 build) and this VM's
// perf cannot count (no hardware counters). Only the main thread is traced. Build and run (bench/trace_adam_step.py
// is such a program and reads the addresses back):
//   gcc -O2 -o /tmp/trace_instructions bench/micro/trace_instructions.c
//   /tmp/trace_instructions ADDRESSES.txt python bench/trace_adam_step.py ADDRESSES.txt
// The marked region runs about 10^5 times slower than normal: keep it to thousands of parameters.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s ADDRESSES.txt PROGRAM [ARGS...]\n", argv[0]);
    return 2;
  }
  const pid_t child = fork();
  if (child == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execvp(argv[2], argv + 2);
    perror("execvp");
    _exit(127);
  }
  FILE* out = fopen(argv[1], "w");
  if (!out) {
    perror(argv[1]);
    return 2;
  }
  int status, marks = 0;
  long steps = 0;
  waitpid(child, &status, 0);  // stopped at the exec
  ptrace(PTRACE_CONT, child, 0, 0);
  while (waitpid(child, &status, 0) == child && WIFSTOPPED(status)) {
    const int sig = WSTOPSIG(status);
    if (sig == SIGSTOP) {  // a mark: suppressed, so the program never stops on it
      if (++marks == 2) {
        fclose(out);
        out = NULL;
      }
      ptrace(marks == 1 ? PTRACE_SINGLESTEP : PTRACE_CONT, child, 0, 0);
      continue;
    }
    if (marks == 1 && sig == SIGTRAP) {  // one instruction stepped
      struct user_regs_struct regs;
      ptrace(PTRACE_GETREGS, child, 0, &regs);
      fprintf(out, "%llx\n", regs.rip);
      ++steps;
      ptrace(PTRACE_SINGLESTEP, child, 0, 0);
      continue;
    }
    ptrace(marks == 1 ? PTRACE_SINGLESTEP : PTRACE_CONT, child, 0, sig == SIGTRAP ? 0 : sig);
  }
  if (out) fclose(out);
  fprintf(stderr, "trace_instructions: %ld instructions between the marks\n", steps);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
