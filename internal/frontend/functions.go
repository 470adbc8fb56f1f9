package frontend

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strconv"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

// maxListItems is the most ListFunctions returns in one page, whatever
// MaxItems asks for (as Lambda does).
const maxListItems = 50

var qualifierRE = regexp.MustCompile(`^(\$LATEST|[a-zA-Z0-9_-]{1,128})$`)

// resolveName turns the {name} path value into a bare function name and a
// qualifier (from the ARN or the Qualifier query parameter). Only a name
// that function.ParseName accepted is ever returned, so no caller can be
// handed a path such as "../x".
func resolveName(r *http.Request) (name, qualifier string, err error) {
	name, qualifier, err = function.ParseName(r.PathValue("name"))
	if err != nil {
		return "", "", err
	}
	if q := r.URL.Query().Get("Qualifier"); q != "" {
		if qualifier != "" && qualifier != q {
			return "", "", errdefs.Invalid("The derived qualifier from the function name does not match the specified qualifier.")
		}
		qualifier = q
	}
	if qualifier != "" && !qualifierRE.MatchString(qualifier) {
		return "", "", errdefs.Invalid("1 validation error detected: Value '%s' at 'qualifier' failed to satisfy constraint: Member must satisfy regular expression pattern: (|[a-zA-Z0-9$_-]+)", truncate(qualifier, 140))
	}
	return name, qualifier, nil
}

// resolveLatest is resolveName for operations that only act on $LATEST
// (updates, concurrency, records): any other qualifier names a function
// version they cannot reach, which Lambda reports as not found.
func (s *Server) resolveLatest(r *http.Request) (string, error) {
	name, q, err := resolveName(r)
	if err != nil {
		return "", err
	}
	if q != "" && q != function.LatestVersion {
		return "", fmt.Errorf("Function not found: %s:%s: %w", function.ARN(s.cfg.Region, s.cfg.Account, name), q, errdefs.ErrNotFound)
	}
	return name, nil
}

// atLeast refuses an explicit value below min. Absent values get Lambda's
// defaults later; an explicit 0 must not be mistaken for "absent".
func atLeast(member string, v *int, min int) error {
	if v != nil && *v < min {
		return errdefs.Invalid("1 validation error detected: Value '%d' at '%s' failed to satisfy constraint: Member must have value greater than or equal to %d", *v, member, min)
	}
	return nil
}

func checkArchitectures(archs []string) error {
	for _, a := range archs {
		if a != "x86_64" {
			return errdefs.Invalid("architecture %q is not supported on this host (supported: x86_64)", truncate(a, 64))
		}
	}
	return nil
}

func unsupportedCode(s3Bucket, s3Key, s3Version, imageURI string) error {
	for _, m := range []struct{ member, v string }{
		{"S3Bucket", s3Bucket}, {"S3Key", s3Key}, {"S3ObjectVersion", s3Version}, {"ImageUri", imageURI},
	} {
		if m.v != "" {
			return errdefs.Invalid("%s is not supported by InvokeX: upload the zip with ZipFile", m.member)
		}
	}
	return nil
}

func (s *Server) createFunction(w http.ResponseWriter, r *http.Request) error {
	var in createFunctionInput
	if err := decodeJSON(w, r, s.cfg.MaxCodeUpload, "CreateFunction", &in); err != nil {
		return err
	}
	if in.FunctionName == "" {
		return errdefs.Invalid("1 validation error detected: Value null at 'functionName' failed to satisfy constraint: Member must not be null")
	}
	name, q, err := function.ParseName(in.FunctionName)
	if err != nil {
		return err
	}
	if q != "" {
		return errdefs.Invalid("a function name with a qualifier cannot be created: %s", truncate(in.FunctionName, 140))
	}
	if in.PackageType != "" && in.PackageType != "Zip" {
		return errdefs.Invalid("PackageType %s is not supported by InvokeX: only Zip packages are", truncate(in.PackageType, 32))
	}
	if len(in.Layers) > 0 {
		return errdefs.Invalid("Layers are not supported by InvokeX: include dependencies in the deployment package")
	}
	if in.Code == nil {
		return errdefs.Invalid("1 validation error detected: Value null at 'code' failed to satisfy constraint: Member must not be null")
	}
	if err := unsupportedCode(in.Code.S3Bucket, in.Code.S3Key, in.Code.S3ObjectVersion, in.Code.ImageUri); err != nil {
		return err
	}
	if len(in.Code.ZipFile) == 0 {
		return errdefs.Invalid("Code.ZipFile is required: upload the deployment package as a base64 zip")
	}
	if err := checkArchitectures(in.Architectures); err != nil {
		return err
	}
	cfg := &function.Config{
		Name:          name,
		Runtime:       in.Runtime,
		Handler:       in.Handler,
		Role:          in.Role,
		Description:   in.Description,
		Architectures: in.Architectures,
		Tags:          in.Tags,
		SnapStart:     function.SnapStart{ApplyOn: in.SnapStart.applyOn()},
	}
	if err := setInts(&cfg.Timeout, &cfg.MemorySize, &cfg.EphemeralStorage, in.Timeout, in.MemorySize, in.EphemeralStorage); err != nil {
		return err
	}
	if in.Environment != nil {
		cfg.Environment = in.Environment.Variables
	}
	out, err := s.api.CreateFunction(r.Context(), cfg, in.Code.ZipFile)
	if err != nil {
		return err
	}
	if in.Publish {
		if out, err = s.publishAfter(r, out); err != nil {
			return err
		}
	}
	return writeJSON(w, http.StatusCreated, s.toConfiguration(out))
}

// publishAfter publishes the revision a CreateFunction or
// UpdateFunctionCode with Publish just stored and returns the version, as
// Lambda's response is then the new version's configuration. The revision
// check makes sure it is that revision, not a later one, that is published.
func (s *Server) publishAfter(r *http.Request, cfg *function.Config) (*function.Config, error) {
	return s.api.PublishVersion(r.Context(), cfg.Name, &controlplane.PublishInput{RevisionID: cfg.RevisionID})
}

// setInts copies the explicit numeric members into a Config after checking
// their lower bounds (upper bounds are function.Config.Validate's).
func setInts(timeout, memory, ephemeral *int, inTimeout, inMemory *int, inEphemeral *ephemeralStorageInput) error {
	var eph *int
	if inEphemeral != nil {
		eph = inEphemeral.Size
		if eph == nil {
			return errdefs.Invalid("1 validation error detected: Value null at 'ephemeralStorage.size' failed to satisfy constraint: Member must not be null")
		}
	}
	if err := atLeast("timeout", inTimeout, 1); err != nil {
		return err
	}
	if err := atLeast("memorySize", inMemory, function.MinMemory); err != nil {
		return err
	}
	if err := atLeast("ephemeralStorage.size", eph, function.MinEphemeral); err != nil {
		return err
	}
	if inTimeout != nil {
		*timeout = *inTimeout
	}
	if inMemory != nil {
		*memory = *inMemory
	}
	if eph != nil {
		*ephemeral = *eph
	}
	return nil
}

// getQualified reads $LATEST or the version the request names and renders
// it: with a qualified FunctionArn when the request named a qualifier.
func (s *Server) getQualified(r *http.Request) (*function.Config, *functionConfiguration, string, error) {
	name, q, err := resolveName(r)
	if err != nil {
		return nil, nil, "", err
	}
	cfg, err := s.api.GetFunctionVersion(r.Context(), name, q)
	if err != nil {
		return nil, nil, "", err
	}
	if q != "" {
		return cfg, s.toQualifiedConfiguration(cfg), q, nil
	}
	return cfg, s.toConfiguration(cfg), q, nil
}

func (s *Server) getFunction(w http.ResponseWriter, r *http.Request) error {
	cfg, conf, q, err := s.getQualified(r)
	if err != nil {
		return err
	}
	out := &getFunctionOutput{
		Configuration: conf,
		Code:          functionCodeLocation{RepositoryType: "S3", Location: codeURL(r, cfg.Name, q)},
		Tags:          cfg.Tags,
	}
	if cfg.ReservedConcurrency != nil {
		out.Concurrency = &concurrency{ReservedConcurrentExecutions: cfg.ReservedConcurrency}
	}
	return writeJSON(w, http.StatusOK, out)
}

// codeURL is where GetFunction's Code.Location points: this server's
// /invokex/v1 code route, absolute as Lambda's presigned URLs are, with the
// qualifier of a published version.
func codeURL(r *http.Request, name, qualifier string) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	u := scheme + "://" + r.Host + "/invokex/v1/functions/" + url.PathEscape(name) + "/code"
	if qualifier != "" {
		u += "?Qualifier=" + url.QueryEscape(qualifier)
	}
	return u
}

func (s *Server) getFunctionConfiguration(w http.ResponseWriter, r *http.Request) error {
	_, conf, _, err := s.getQualified(r)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, conf)
}

// pageParams reads a list operation's Marker and MaxItems (at most
// maxListItems per page, whatever is asked, as Lambda does).
func pageParams(r *http.Request) (marker string, max int, err error) {
	q := r.URL.Query()
	max = maxListItems
	if v := q.Get("MaxItems"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return "", 0, errdefs.Invalid("1 validation error detected: Value '%s' at 'maxItems' failed to satisfy constraint: Member must have value greater than or equal to 1", truncate(v, 32))
		}
		max = min(n, maxListItems)
	}
	marker = q.Get("Marker")
	if len(marker) > 1024 {
		return "", 0, errdefs.Invalid("Marker is not one this server returned")
	}
	return marker, max, nil
}

func (s *Server) listFunctions(w http.ResponseWriter, r *http.Request) error {
	marker, max, err := pageParams(r)
	if err != nil {
		return err
	}
	fns, next, err := s.api.ListFunctions(r.Context(), marker, max)
	if err != nil {
		return err
	}
	out := &listFunctionsOutput{Functions: make([]*functionConfiguration, 0, len(fns)), NextMarker: next}
	for _, f := range fns {
		out.Functions = append(out.Functions, s.toConfiguration(f))
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *Server) updateFunctionCode(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	var in updateFunctionCodeInput
	if err := decodeJSON(w, r, s.cfg.MaxCodeUpload, "UpdateFunctionCode", &in); err != nil {
		return err
	}
	if err := unsupportedCode(in.S3Bucket, in.S3Key, in.S3ObjectVersion, in.ImageUri); err != nil {
		return err
	}
	if len(in.ZipFile) == 0 {
		return errdefs.Invalid("ZipFile is required: upload the deployment package as a base64 zip")
	}
	if in.DryRun {
		return errdefs.Invalid("DryRun is not supported by InvokeX for UpdateFunctionCode")
	}
	if err := checkArchitectures(in.Architectures); err != nil {
		return err
	}
	cfg, err := s.api.UpdateFunctionCode(r.Context(), name, in.ZipFile, in.RevisionId)
	if err != nil {
		return err
	}
	if in.Publish {
		if cfg, err = s.publishAfter(r, cfg); err != nil {
			return err
		}
	}
	return writeJSON(w, http.StatusOK, s.toConfiguration(cfg))
}

func (s *Server) updateFunctionConfiguration(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	var in updateFunctionConfigurationInput
	if err := decodeJSON(w, r, maxJSONBody, "UpdateFunctionConfiguration", &in); err != nil {
		return err
	}
	if len(in.Layers) > 0 {
		return errdefs.Invalid("Layers are not supported by InvokeX: include dependencies in the deployment package")
	}
	upd := &controlplane.ConfigUpdate{
		Runtime:     in.Runtime,
		Handler:     in.Handler,
		Role:        in.Role,
		Description: in.Description,
	}
	var timeout, memory, ephemeral int
	if err := setInts(&timeout, &memory, &ephemeral, in.Timeout, in.MemorySize, in.EphemeralStorage); err != nil {
		return err
	}
	if in.Timeout != nil {
		upd.Timeout = &timeout
	}
	if in.MemorySize != nil {
		upd.MemorySize = &memory
	}
	if in.EphemeralStorage != nil {
		upd.EphemeralStorage = &ephemeral
	}
	if in.SnapStart != nil {
		v := in.SnapStart.applyOn()
		upd.SnapStart = &v
	}
	if in.Environment != nil {
		// Environment{} without Variables clears them, as in Lambda.
		vars := in.Environment.Variables
		if vars == nil {
			vars = map[string]string{}
		}
		upd.Environment = &vars
	}
	cfg, err := s.api.UpdateFunctionConfiguration(r.Context(), name, upd, in.RevisionId)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, s.toConfiguration(cfg))
}

// deleteFunction deletes the function and all its versions, or with a
// qualifier only that published version ($LATEST cannot be deleted alone).
func (s *Server) deleteFunction(w http.ResponseWriter, r *http.Request) error {
	name, q, err := resolveName(r)
	if err != nil {
		return err
	}
	if q != "" {
		err = s.api.DeleteFunctionVersion(r.Context(), name, q)
	} else {
		err = s.api.DeleteFunction(r.Context(), name)
	}
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) putFunctionConcurrency(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	var in putConcurrencyInput
	if err := decodeJSON(w, r, maxJSONBody, "PutFunctionConcurrency", &in); err != nil {
		return err
	}
	if in.ReservedConcurrentExecutions == nil {
		return errdefs.Invalid("1 validation error detected: Value null at 'reservedConcurrentExecutions' failed to satisfy constraint: Member must not be null")
	}
	if err := atLeast("reservedConcurrentExecutions", in.ReservedConcurrentExecutions, 0); err != nil {
		return err
	}
	cfg, err := s.api.PutFunctionConcurrency(r.Context(), name, in.ReservedConcurrentExecutions)
	if err != nil {
		return err
	}
	out := concurrency{ReservedConcurrentExecutions: in.ReservedConcurrentExecutions}
	if cfg != nil && cfg.ReservedConcurrency != nil {
		out.ReservedConcurrentExecutions = cfg.ReservedConcurrency
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *Server) getFunctionConcurrency(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	cfg, err := s.api.GetFunction(r.Context(), name)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, concurrency{ReservedConcurrentExecutions: cfg.ReservedConcurrency})
}

func (s *Server) deleteFunctionConcurrency(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	if _, err := s.api.PutFunctionConcurrency(r.Context(), name, nil); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
