from signalprop.cli import run

run()
