<#
.SYNOPSIS
Run, test or benchmark the chat backend from PowerShell: the same modes as start.sh.

.DESCRIPTION
  .\start.ps1 dev            development server (python app.py), debug logging
  .\start.ps1 prod           gunicorn needs Linux: explains, offers `docker compose up --build`
  .\start.ps1 light          the same, with 2 workers per app container
  .\start.ps1 test [args]    the pytest suite (installs what it needs); pytest args pass through
  .\start.ps1 test URL       Invoke-WebRequest checks of health and metrics on a running server
  .\start.ps1 perf [args]    the load benchmark (bench/run.py); needs Linux, so WSL on Windows

Each mode creates .venv and installs the requirements when they are missing or changed.
On Linux and macOS (PowerShell 7) every mode hands over to start.sh.
#>
# No param block: pytest's and the benchmark's own options (-k, -m, -v, --quick) must pass
# through untouched, and a declared parameter would capture them.
$Mode = if ($args.Count -gt 0) { [string]$args[0] } else { "dev" }
[string[]]$Rest = @($args | Select-Object -Skip 1)
if ($Mode -notin @("dev", "prod", "light", "test", "perf")) {
    Write-Host "usage: .\start.ps1 {dev|prod|light|test [URL]|perf}"
    exit 2
}

$ErrorActionPreference = "Stop"
Set-Location -LiteralPath $PSScriptRoot
$env:PYTHONUNBUFFERED = "1"

function Say([string]$Text) { Write-Host "==> $Text" -ForegroundColor Cyan }

$OnWindows = ($PSVersionTable.PSEdition -eq "Desktop") -or $IsWindows
if (-not $OnWindows) {
    # PowerShell on Linux or macOS: start.sh is the real thing.
    & bash ./start.sh $Mode @Rest
    exit $LASTEXITCODE
}

$Venv = ".venv"
$Py = Join-Path $Venv "Scripts\python.exe"

function Find-Python {
    # A missing version makes py write to stderr: under "Stop", Windows PowerShell would throw.
    $ErrorActionPreference = "Continue"
    # The py launcher first (it knows every installed version), then python on PATH.
    foreach ($version in "3.12", "3.11", "3.13") {
        if (Get-Command py -ErrorAction SilentlyContinue) {
            & py "-$version" -c "import sys" 2>$null
            if ($LASTEXITCODE -eq 0) { return @("py", "-$version") }
        }
    }
    foreach ($name in "python", "python3") {
        if (Get-Command $name -ErrorAction SilentlyContinue) {
            & $name -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" 2>$null
            if ($LASTEXITCODE -eq 0) { return @($name) }
        }
    }
    throw "Python 3.11 or newer is needed: install it from https://www.python.org/downloads/ or 'winget install Python.Python.3.12'"
}

# Install a requirements file once; reinstall only when the file changes.
function Install-Requirements([string]$File) {
    $hash = (Get-FileHash -Algorithm SHA256 -LiteralPath $File).Hash.Substring(0, 16).ToLower()
    $stamp = Join-Path $Venv ".installed-$(Split-Path $File -Leaf)-$hash"
    if (Test-Path -LiteralPath $stamp) { return }
    Say "installing $File into $Venv"
    & $Py -m pip install --disable-pip-version-check -q -r $File
    if ($LASTEXITCODE -ne 0) { throw "pip could not install $File (exit code $LASTEXITCODE)" }
    New-Item -ItemType File -Path $stamp -Force | Out-Null
}

function Initialize-Venv {
    if (-not (Test-Path -LiteralPath $Py)) {
        Say "creating $Venv"
        $python = @(Find-Python)
        $launcher = $python[0]
        $launcherArgs = @($python | Select-Object -Skip 1)
        & $launcher @launcherArgs -m venv $Venv
        if ($LASTEXITCODE -ne 0) { throw "could not create $Venv" }
        & $Py -m pip install --disable-pip-version-check -q --upgrade pip
    }
    Install-Requirements "requirements.txt"
}

function Show-LinuxOnly([string]$What) {
    Write-Host ""
    Write-Host "$What runs gunicorn with gevent workers, and gunicorn does not run on Windows"
    Write-Host "(it needs fork() and Unix signals). On this machine use one of:"
    Write-Host "  - Docker Desktop:  docker compose up --build     (app behind nginx on http://localhost:4343,"
    Write-Host "                     with PostgreSQL and Redis; see docker-compose.yml)"
    Write-Host "  - WSL:             wsl ./start.sh $Mode"
    Write-Host "  - development:     .\start.ps1 dev               (Flask's server: fine to try it, not for production)"
    Write-Host ""
}

function Invoke-Compose([string[]]$ComposeArgs) {
    if (-not (Get-Command docker -ErrorAction SilentlyContinue)) {
        Write-Host "Docker is not installed: https://docs.docker.com/desktop/setup/install/windows-install/"
        exit 1
    }
    $interactive = [Environment]::UserInteractive -and -not [Console]::IsInputRedirected
    if (-not $interactive) {
        Write-Host "run: docker $($ComposeArgs -join ' ')"
        exit 1
    }
    $answer = Read-Host "Run 'docker $($ComposeArgs -join ' ')' now? [y/N]"
    if ($answer -notmatch '^(y|yes)$') { exit 1 }
    & docker @ComposeArgs
    exit $LASTEXITCODE
}

# The checks of bench/smoke.sh, with Invoke-WebRequest: status 200 and a telling piece of body.
function Test-Url([string]$Base) {
    $Base = $Base.TrimEnd("/")
    $checks = @(
        @("health", "/api/health", '"status"'),
        @("health/live", "/api/health/live", "alive"),
        @("health/ready", "/api/health/ready", "ready"),
        @("metrics (json)", "/api/metrics", '"requests"'),
        @("metrics (prom)", "/metrics", "chat_http_requests_total"),
        @("models", "/v1/models", '"object":"list"')
    )
    Write-Host "checking $Base"
    $failures = 0
    foreach ($check in $checks) {
        $name, $path, $expect = $check
        $watch = [Diagnostics.Stopwatch]::StartNew()
        $code = 0
        $body = ""
        try {
            $response = Invoke-WebRequest -Uri "$Base$path" -UseBasicParsing -TimeoutSec 5
            $code = [int]$response.StatusCode
            $body = [string]$response.Content
        } catch {
            # Windows PowerShell throws on 4xx/5xx; the status and body are still worth showing.
            $failed = $_.Exception.Response
            if ($null -ne $failed) { $code = [int]$failed.StatusCode }
            $body = if ($_.ErrorDetails) { $_.ErrorDetails.Message } else { $_.Exception.Message }
        }
        $seconds = "{0:N3}" -f $watch.Elapsed.TotalSeconds
        if ($code -eq 200 -and $body.Contains($expect)) {
            Write-Host ("ok    {0,-22} {1} in {2}s" -f $name, $code, $seconds)
        } else {
            Write-Host ("FAIL  {0,-22} {1}" -f $name, $code) -ForegroundColor Red
            $short = if ($body.Length -gt 400) { $body.Substring(0, 400) } else { $body }
            Write-Host "      $short"
            $failures++
        }
    }
    try {
        $status = (Invoke-RestMethod -Uri "$Base/api/health" -TimeoutSec 5).status
    } catch {
        $status = "unreachable"
    }
    Write-Host "server status: $status"
    if ($failures -gt 0) {
        Write-Host "$failures check(s) failed"
        exit 1
    }
    Write-Host "all checks passed"
    exit 0
}

switch ($Mode) {
    "dev" {
        Initialize-Venv
        if (-not $env:LOG_LEVEL) { $env:LOG_LEVEL = "DEBUG" }
        $hostName = if ($env:HOST) { $env:HOST } else { "0.0.0.0" }
        $port = if ($env:PORT) { $env:PORT } else { "4343" }
        $provider = if ($env:LLM_PROVIDER) { $env:LLM_PROVIDER } else { "g4f" }
        $database = if ($env:DATABASE_URL) { $env:DATABASE_URL } else { "embedded in $(if ($env:DATA_DIR) { $env:DATA_DIR } else { './data' })" }
        Say "development server on http://${hostName}:$port (provider $provider; database $database)"
        & $Py app.py
        exit $LASTEXITCODE
    }
    "prod" {
        Show-LinuxOnly "prod"
        Invoke-Compose @("compose", "up", "--build")
    }
    "light" {
        Show-LinuxOnly "light"
        # One app container with 2 gevent workers: the compose file reads WEB_CONCURRENCY from .docker.env.
        Write-Host "For the light setup put WEB_CONCURRENCY=2 in .docker.env (copy .docker.env.example)."
        Invoke-Compose @("compose", "up", "--build", "--scale", "app=1")
    }
    "test" {
        if ($Rest.Count -gt 0 -and $Rest[0] -match '^https?://') {
            Test-Url $Rest[0]
        }
        Initialize-Venv
        Install-Requirements "requirements-dev.txt"
        if ($env:CHAT_SKIP_LOCAL -ne "1") {
            # llama-cpp-python builds from source (CMake and the Visual Studio C++ tools).
            try {
                Install-Requirements "requirements-local.txt"
            } catch {
                Write-Warning "the local provider could not be installed ($($_.Exception.Message)); its tests will fail. Set CHAT_SKIP_LOCAL=1 to stop trying."
            }
        }
        Write-Warning ("much of the suite starts real gunicorn, redis-server, nginx and Chromium, which need " +
                       "Linux: run the whole suite under WSL (wsl ./start.sh test) or pass a subset here.")
        Say "running the test suite"
        & $Py -m pytest @Rest
        exit $LASTEXITCODE
    }
    "perf" {
        # The benchmark measures the production server (gunicorn) and reads worker memory from /proc.
        Write-Host "The load benchmark runs the production server (gunicorn) and reads /proc: it needs Linux."
        if (Get-Command wsl -ErrorAction SilentlyContinue) {
            Say "running it under WSL: wsl ./start.sh perf $($Rest -join ' ')"
            & wsl ./start.sh perf @Rest
            exit $LASTEXITCODE
        }
        Write-Host "Install WSL (wsl --install), then: wsl ./start.sh perf $($Rest -join ' ')"
        exit 1
    }
}
