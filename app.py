from chat import create_app

app = create_app()

if __name__ == "__main__":
    from chat.devserver import main

    main(app)
