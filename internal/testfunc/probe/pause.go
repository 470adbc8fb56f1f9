package main

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
)

// pauseELF returns the smallest executable that sleeps: a static x86-64
// Linux ELF of one loadable segment whose code calls pause(2) forever
// (SIGKILL and default-fatal signals end it).
//
// The fork bomb needs a child that costs one task and almost no memory
// when the sandbox has no /bin/sleep (the VMs' tiny provided root). The
// probe itself is no such child: a Go program starts several threads and
// dirties about 1 MiB, so a few hundred of them exhaust a 256 MB guest
// long before the 1,024-task limit does.
func pauseELF() []byte {
	code := []byte{
		0xb8, 0x22, 0x00, 0x00, 0x00, // mov eax, 34 (SYS_pause)
		0x0f, 0x05, // syscall
		0xeb, 0xf7, // jmp -9 (back to the mov)
	}
	const (
		base    = 0x400000
		ehsize  = 64 // sizeof(Elf64_Ehdr)
		phsize  = 56 // sizeof(Elf64_Phdr)
		codeOff = ehsize + phsize
	)
	size := uint64(codeOff + len(code))
	h := elf.Header64{
		Type:      uint16(elf.ET_EXEC),
		Machine:   uint16(elf.EM_X86_64),
		Version:   uint32(elf.EV_CURRENT),
		Entry:     base + codeOff,
		Phoff:     ehsize,
		Ehsize:    ehsize,
		Phentsize: phsize,
		Phnum:     1,
	}
	copy(h.Ident[:], elf.ELFMAG)
	h.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	h.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	h.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	p := elf.Prog64{
		Type:   uint32(elf.PT_LOAD),
		Flags:  uint32(elf.PF_R | elf.PF_X),
		Vaddr:  base,
		Paddr:  base,
		Filesz: size,
		Memsz:  size,
		Align:  0x1000,
	}
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, h) // a bytes.Buffer does not fail
	binary.Write(&b, binary.LittleEndian, p)
	b.Write(code)
	return b.Bytes()
}

// writePause writes pauseELF to a new executable file in the temporary
// directory (Lambda's /tmp allows exec) and returns its path; the caller
// removes it.
func writePause() (string, error) {
	if runtime.GOARCH != "amd64" {
		return "", errors.New("the pause child is x86-64 code")
	}
	f, err := os.CreateTemp("", "probe-pause-")
	if err != nil {
		return "", err
	}
	_, err = f.Write(pauseELF())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o755)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("writing the pause child: %w", err)
	}
	return f.Name(), nil
}
