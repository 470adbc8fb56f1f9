package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// RIEPackage is the emulator the benchmark compares against, pinned to the
// version the issue names.
const RIEPackage = "github.com/aws/aws-lambda-runtime-interface-emulator/cmd/aws-lambda-rie@v0.0.0-20261030222936-bef5c4ba774d"

// RIEName is the emulator's command name.
const RIEName = "aws-lambda-rie"

// FindRIE returns the path of aws-lambda-rie: on PATH, else in
// $(go env GOPATH)/bin (or GOBIN). When it is in neither and install is
// set, it runs `go install RIEPackage` (its output to out) and returns the
// installed binary.
func FindRIE(ctx context.Context, goBin string, install bool, out io.Writer) (string, error) {
	if p, err := exec.LookPath(RIEName); err == nil {
		return p, nil
	}
	if goBin == "" {
		p, err := exec.LookPath("go")
		if err != nil {
			return "", fmt.Errorf("%s is not on PATH and there is no go command to install it", RIEName)
		}
		goBin = p
	}
	binDir, err := goBinDir(ctx, goBin)
	if err != nil {
		return "", err
	}
	p := filepath.Join(binDir, RIEName)
	if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
		return p, nil
	}
	if !install {
		return "", fmt.Errorf("%s not found on PATH or in %s (go install %s)", RIEName, binDir, RIEPackage)
	}
	if out == nil {
		out = io.Discard
	}
	fmt.Fprintf(out, "bench: installing %s\n", RIEPackage)
	cmd := exec.CommandContext(ctx, goBin, "install", RIEPackage)
	// Outside InvokeX's module, so its go.mod plays no part.
	cmd.Dir = os.TempDir()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("installing %s: %w", RIEName, err)
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("installed %s but it is not at %s: %w", RIEName, p, err)
	}
	return p, nil
}

// goBinDir is where `go install` puts binaries: GOBIN, else GOPATH/bin.
func goBinDir(ctx context.Context, goBin string) (string, error) {
	out, err := exec.CommandContext(ctx, goBin, "env", "GOBIN", "GOPATH").Output()
	if err != nil {
		return "", fmt.Errorf("go env: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) >= 1 && strings.TrimSpace(lines[0]) != "" {
		return strings.TrimSpace(lines[0]), nil
	}
	if len(lines) >= 2 && strings.TrimSpace(lines[1]) != "" {
		// GOPATH may be a list; go install uses the first entry.
		first := filepath.SplitList(strings.TrimSpace(lines[1]))[0]
		return filepath.Join(first, "bin"), nil
	}
	return "", errors.New("go env reports neither GOBIN nor GOPATH")
}

// FindModuleDir returns the directory of InvokeX's go.mod at or above dir.
func FindModuleDir(dir string) (string, error) {
	d, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/invokex/invokex\n")) {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no InvokeX source tree (go.mod of github.com/invokex/invokex) at or above %s", dir)
		}
		d = parent
	}
}
