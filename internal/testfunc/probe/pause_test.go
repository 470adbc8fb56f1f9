package main

import (
	"bytes"
	"debug/elf"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestPauseELFIsAStaticExecutable(t *testing.T) {
	f, err := elf.NewFile(bytes.NewReader(pauseELF()))
	if err != nil {
		t.Fatalf("pauseELF is not an ELF file: %v", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Errorf("pauseELF is %s %s %s, want a 64-bit x86-64 executable", f.Class, f.Machine, f.Type)
	}
	if len(f.Progs) != 1 || f.Progs[0].Type != elf.PT_LOAD {
		t.Fatalf("pauseELF has program headers %v, want one PT_LOAD", f.Progs)
	}
	if p := f.Progs[0]; f.Entry < p.Vaddr || f.Entry >= p.Vaddr+p.Filesz || p.Flags&elf.PF_X == 0 {
		t.Errorf("entry %#x is outside the executable segment %+v", f.Entry, p.ProgHeader)
	}
}

// TestPauseChildSleepsAsOneTask runs the pause child: it must stay
// alive, asleep, as a single task until it is killed.
func TestPauseChildSleepsAsOneTask(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("skipping: the pause child is x86-64 code")
	}
	p, err := writePause()
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	pid, err := syscall.ForkExec(p, []string{p}, &syscall.ProcAttr{Files: []uintptr{}})
	if err != nil {
		t.Fatalf("running the pause child: %v", err)
	}
	defer func() {
		syscall.Kill(pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, 0, nil)
		if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("the pause child ended with %v, want killed by SIGKILL", ws)
		}
	}()
	// It is asleep in pause(2) once it has run its first instruction; a
	// child that crashed (bad ELF) is a zombie instead. Poll, bounded.
	var status string
	for range 100 {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
		if err != nil {
			t.Fatal(err)
		}
		status = string(b)
		if strings.Contains(status, "\nState:\tS") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(status, "\nState:\tS") || !strings.Contains(status, "\nThreads:\t1\n") {
		t.Errorf("the pause child is not a sleeping single task:\n%s", status)
	}
}
